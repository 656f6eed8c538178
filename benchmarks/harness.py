"""The benchmark harness's shared pieces: shapes, cost models, the roofline, the compared variants
of each op, and the compact result format.

Used by ``run.py`` (``make bench``, the GPU kernel sweep), ``report.py`` (tables and plots from a
results file) and the pytest-benchmark suite ``test_bench_ops.py``. The timer and the record of
the machine are the package's own (:mod:`crossvit_kernels.timing`,
:func:`crossvit_kernels.info.environment`), shared with the end-to-end CLI.

Conventions (stated once, used everywhere):

* Times are milliseconds; a measurement is the timer's summary (median, quartiles, extremes,
  repeats). "fwd" is an inference forward under ``torch.no_grad()``; "fwd+bwd" is a forward with
  autograd and ``torch.autograd.grad`` of a fixed random output gradient with respect to every
  input and parameter (nothing accumulates, so the call can be repeated and captured in a CUDA
  graph as it is).
* Shapes come from :data:`crossvit_kernels.models.MODEL_CONFIGS` (read off meta-device models):
  the fusion shapes (N, C, H) of every variant, N = 1 + the other branch's patches, the
  patch-embedding inputs (image, patch, C) of both branches, and the fusion-stage geometries
  (N0, C0, N1, C1, H0, H1): branch b's tokens N_b = 1 + its patches, width C_b; direction d
  (branch d's CLS attending over branch 1 - d) with H_d heads.
* Multiply-adds (MACs) count one multiply and one add as one; backward counts twice the forward,
  so fwd+bwd = 3 x fwd (patch embedding: 2 x, the images need no gradient).
* The roofline of a kernel is max(bytes / measured bandwidth, MACs / measured GEMM rate) with
  the bytes of the fused form (every input read once, every output written once); the measured
  floor of a cross-attention shape is ``x.sum()`` (fwd) and ``x.sum()`` + a copy (fwd+bwd) of its
  tokens, timed alongside the variants. The floor of the fusion stage is its byte model's
  bytes-once floor (``crossvit_kernels.backends.triton.fusion.stage_bytes``: both branches,
  every parameter and, with the backward, every gradient read or written once) at the measured
  copy bandwidth.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
OUT_DIR = os.path.join(HERE, "out")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    key = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[key]


# ------------------------------------------------------------------------------------------------
# shapes of the published variants
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def variant_geometry(name: str) -> dict:
    """Widths, heads, token grids, image sizes and fusion shapes of one variant of MODEL_CONFIGS."""
    from crossvit_kernels.models import create_model
    m = create_model(name, device="meta")
    C0, C1 = m.embed_dim
    H0 = m.blocks[0].blocks[0][0].attn.num_heads
    H1 = m.blocks[0].blocks[1][0].attn.num_heads
    P0, P1 = (pe.num_patches for pe in m.patch_embed)
    return {
        "model": name, "img_size": m.img_size[0], "branch_sizes": [s[0] for s in m.img_size_scaled],
        "patch_sizes": [pe.patch_size[0] for pe in m.patch_embed], "embed_dim": [C0, C1], "num_heads": [H0, H1],
        "num_patches": [P0, P1], "dagger": bool(m.patch_embed[0].multi_conv), "blocks": len(m.blocks),
        # fusion[0]: branch 0's projected CLS attends over branch 1's tokens, width C1, heads H1;
        # fusion[1]: branch 1's projected CLS attends over branch 0's tokens, width C0, heads H0.
        "fusion_shapes": [{"fusion": 0, "N": 1 + P1, "C": C1, "H": H1},
                          {"fusion": 1, "N": 1 + P0, "C": C0, "H": H0}],
    }


def models_matching(patterns: Optional[Sequence[str]]) -> List[str]:
    """The variants matching shell-style patterns (all 11 for None), in timm's order."""
    from crossvit_kernels.models import list_models
    if not patterns:
        return list_models()
    names: List[str] = []
    for pat in patterns:
        found = list_models(pat)
        if not found:
            raise ValueError(f"no CrossViT variant matches {pat!r}; known: {', '.join(list_models())}")
        names += [n for n in found if n not in names]
    return names


def fusion_shapes(models: Sequence[str]) -> List[dict]:
    """The distinct cross-attention shapes {N, C, H, uses} of ``models`` (uses: "model/fusion.i")."""
    shapes: Dict[tuple, dict] = {}
    for name in models:
        for fs in variant_geometry(name)["fusion_shapes"]:
            entry = shapes.setdefault((fs["N"], fs["C"], fs["H"]), {"N": fs["N"], "C": fs["C"], "H": fs["H"],
                                                                    "uses": []})
            entry["uses"].append(f"{name}/fusion.{fs['fusion']}")
    return list(shapes.values())


def patch_embed_shapes(models: Sequence[str]) -> List[dict]:
    """The distinct patch-embedding inputs {img, patch, C, uses} of both branches of ``models``.

    The dagger variants embed with three convolutions instead; the op runs at their sizes and
    widths all the same (the 240-px dagger models share every input with a plain variant)."""
    out: Dict[tuple, dict] = {}
    for name in models:
        g = variant_geometry(name)
        for br in (0, 1):
            key = (g["branch_sizes"][br], g["patch_sizes"][br], g["embed_dim"][br])
            e = out.setdefault(key, {"img": key[0], "patch": key[1], "C": key[2], "uses": []})
            e["uses"].append(f"{name}/branch{br}")
    return list(out.values())


def stage_geometries(models: Sequence[str]) -> List[dict]:
    """The distinct fusion-stage geometries {N0, C0, N1, C1, H0, H1, uses} of ``models`` (uses:
    "model/fusion_stage"); the stage depends only on the widths, heads and token counts (the
    dagger variants share theirs with the plain ones)."""
    out: Dict[tuple, dict] = {}
    for name in models:
        g = variant_geometry(name)
        (P0, P1), (C0, C1) = g["num_patches"], g["embed_dim"]
        # direction d attends over branch 1 - d with that branch's heads
        s = {"N0": 1 + P0, "C0": C0, "N1": 1 + P1, "C1": C1, "H0": g["num_heads"][1], "H1": g["num_heads"][0]}
        out.setdefault(tuple(s.values()), dict(s, uses=[]))["uses"].append(f"{name}/fusion_stage")
    return list(out.values())


STAGE_KEYS = ("N0", "C0", "N1", "C1", "H0", "H1")


def short_uses(uses: Iterable[str]) -> str:
    """"9_240,18_dagger_240" from ["crossvit_9_240/fusion.0", ...]."""
    return ",".join(sorted({u.split("/")[0].replace("crossvit_", "") for u in uses}))


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


def ca_bytes(B: int, N: int, C: int, elt: int, mode: str, form: str = "fused") -> int:
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


def pe_macs(B: int, img: int, patch: int, C: int, cin: int = 3) -> int:
    return B * (img // patch) ** 2 * C * cin * patch * patch


def pe_bytes(B: int, img: int, patch: int, C: int, elt: int, mode: str, cin: int = 3) -> int:
    """Fused patch embedding: image read once, token buffer written once, weight + position
    embedding read once. Backward (images need no gradient): the output gradient read once,
    the images read again, the parameter gradients written."""
    P, K = (img // patch) ** 2, cin * patch * patch
    images = B * cin * img * img * elt
    out = B * (1 + P) * C * elt
    params = (C * K + (1 + P) * C + 2 * C) * elt
    fwd = images + out + params
    return fwd if mode == "fwd" else fwd + out + images + params


def mode_factor(op: str, mode: str) -> int:
    """fwd+bwd MACs over fwd MACs (see the conventions)."""
    return 1 if mode == "fwd" else (3 if op == "cross_attention" else 2)


def stage_macs_textbook(B: int, s: dict) -> int:
    """Forward MACs of the fusion stage of geometry ``s`` in timm's form: both directions'
    cross-attention blocks (the projections' B x C0 x C1 products are negligible beside them)."""
    return ca_macs_textbook(B, s["N1"], s["C1"]) + ca_macs_textbook(B, s["N0"], s["C0"])


def stage_floor_bytes(B: int, s: dict, elt: int, mode: str) -> int:
    """The fusion stage's bytes-once floor (read + written) from the triton backend's byte model."""
    from crossvit_kernels.backends.triton.fusion import stage_bytes
    m = stage_bytes(B, (s["N0"], s["N1"]), (s["C0"], s["C1"]), (s["H0"], s["H1"]), elt)
    return sum(m["floor_fwd"]) + (sum(m["floor_bwd"]) if mode != "fwd" else 0)


# ------------------------------------------------------------------------------------------------
# the roofline: measured once per run and dtype
# ------------------------------------------------------------------------------------------------


def measure_roofline(timer, device: torch.device, dtype: torch.dtype, copy_numel: int,
                     gemm_sizes: Sequence[Sequence[int]], log: Callable[[str], None] = print) -> dict:
    """Copy bandwidth (bytes read + written), read bandwidth (``x.sum()``) and the GEMM rate
    (``torch.mm``, the best of ``gemm_sizes`` (M, K, N)) on this device in ``dtype``."""
    elt = torch.empty((), dtype=dtype).element_size()
    log(f"roofline: copy / read bandwidth over {copy_numel * elt / 2**20:.0f} MiB")
    t = _time_bandwidth(timer, torch.randn(copy_numel, device=device).to(dtype))
    out = {"bytes": copy_numel * elt, "copy": t["copy"], "read": t["read"],
           "copy_gbs": 2 * copy_numel * elt / (t["copy"]["median_ms"] * 1e6),
           "read_gbs": copy_numel * elt / (t["read"]["median_ms"] * 1e6), "gemm": []}
    for M, K, N in gemm_sizes:
        log(f"roofline: torch.mm {M}x{K} @ {K}x{N}")
        tm = _time_gemm(timer, torch.randn(M, K, device=device).to(dtype), torch.randn(K, N, device=device).to(dtype))
        out["gemm"].append({"shape": [M, K, N], **tm, "gmacs": M * K * N / (tm["median_ms"] * 1e6)})
    out["gemm_gmacs"] = max(g["gmacs"] for g in out["gemm"])
    return out


def _time_bandwidth(timer, x: torch.Tensor) -> dict:
    y = torch.empty_like(x)
    return timer.group({"copy": lambda: y.copy_(x), "read": lambda: x.sum()}, catch=False)


def _time_gemm(timer, a: torch.Tensor, b: torch.Tensor) -> dict:
    return timer(lambda: torch.mm(a, b), catch=False)


def roofline_ms(roof: dict, nbytes: float, macs: float, rw: bool) -> float:
    """The time no kernel can beat here: max(bytes / bandwidth, MACs / GEMM rate), with the copy
    bandwidth when the kernel writes as much as it reads (``rw``), else the read bandwidth."""
    bw = roof["copy_gbs"] if rw else roof["read_gbs"]
    return max(nbytes / (bw * 1e6), macs / (roof["gemm_gmacs"] * 1e6))


# ------------------------------------------------------------------------------------------------
# the compared variants of each op
# ------------------------------------------------------------------------------------------------

#: The package's backends that run a fused form (``reference`` is the textbook one, as timm).
FUSED_BACKENDS = ("triton", "cuda", "cpp", "torch")

#: Every variant a run can compare, per op:
#:   timm            timm's block / PatchEmbed + cat + add (the baseline)
#:   sdpa            the textbook cross-attention with materialised K, V and
#:                   F.scaled_dot_product_attention over the one query
#:   <backend>       crossvit_kernels.ops.<op>(..., backend=<backend>), reference and fused ones
#:   triton-unfused  the triton backend with its projections as PyTorch ops around the core
#:                   (FUSED_ENV off): what fusing them saves; forward only (with a gradient the op
#:                   always takes that path)
#:   <backend>-core  the backend's one-pass core alone (Backend.cross_attention_core_forward /
#:                   _backward, the absorbed query given), without the O(C^2) projections
#:   read, copy      the measured floor: x.sum() and a copy of the tokens
CA_EXTRA = ("timm", "sdpa", "triton-unfused") + tuple(f"{b}-core" for b in FUSED_BACKENDS) + ("read", "copy")

#: The fusion stage's variants: timm (its MultiScaleBlock's forward, the encoder layers replaced by
#: identities), the package's block on each backend (the stage op where the backend declares it, else
#: the model's per-piece fallback: see :func:`stage_path`), and the triton backend with one of its
#: environment knobs set, {impl: {module of crossvit_kernels.backends.triton, the name of the knob's
#: constant there, its value, the modes and dtypes where it changes anything}}:
#:   triton-hilo0    CROSSVIT_KERNELS_TRITON_HILO=0: the token products' float32 operands rounded
#:                   to the 16-bit dtype once instead of carried as hi + lo pairs (16-bit tokens)
#:   triton-seqc     CROSSVIT_KERNELS_FUSION_SEQUENTIAL_C=1: backward launch C as two launches
#:                   (rows, then tiles) instead of one with its ticket protocol (fwd+bwd)
STAGE_KNOBS = {
    "triton-hilo0": {"module": "cross_attention", "env": "HILO_ENV", "value": "0", "modes": ("fwd", "fwd+bwd"),
                     "dtypes": (torch.bfloat16, torch.float16)},
    "triton-seqc": {"module": "fusion", "env": "SEQUENTIAL_C_ENV", "value": "1", "modes": ("fwd+bwd",),
                    "dtypes": (torch.float32, torch.bfloat16, torch.float16)},
}


def impl_status(op: str, impl: str, device: torch.device, dtype: torch.dtype,
                allow_interpreter: bool = False) -> Optional[str]:
    """None when variant ``impl`` of ``op`` can run here, else why not."""
    from crossvit_kernels import backends
    if impl in ("read", "copy"):
        return None if op == "cross_attention" else f"{impl} is a floor of the cross-attention rows only"
    if impl == "timm":
        try:
            import timm  # noqa: F401
        except ImportError as exc:
            return f"timm is not installed ({exc})"
        return None
    if impl == "sdpa":
        return None if op == "cross_attention" else "sdpa is a cross-attention variant"
    backend = impl
    if impl == "triton-unfused" or impl.endswith("-core"):
        if op != "cross_attention":
            return f"{impl} is a cross-attention variant"
        backend = "triton" if impl == "triton-unfused" else impl[:-len("-core")]
    if impl in STAGE_KNOBS:
        if op != "fusion_stage":
            return f"{impl} is a fusion-stage variant"
        if dtype not in STAGE_KNOBS[impl]["dtypes"]:
            return f"{impl} changes nothing in {dtype}"
        backend = "triton"
    if backend not in backends.BACKENDS:
        return f"unknown variant {impl!r}"
    if backend == "triton" and device.type != "cuda" and not allow_interpreter:
        return "CPU tensors run Triton only in the interpreter (not timed unless --allow-interpreter)"
    why = backends.supports(backend, op, device, dtype)
    if why is not None and op == "fusion_stage" and impl not in STAGE_KNOBS:
        return backends.supports(backend, "cross_attention", device, dtype)  # the per-piece fallback
    return why


def stage_path(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """How variant ``impl`` of the fusion stage runs here: "timm" (timm's modules), "stage op" (a
    backend that declares the stage: ``crossvit_kernels.ops.fusion``) or "per piece" (the model's
    fallback where the backend does not: the projections as modules, its cross-attention op per
    direction)."""
    from crossvit_kernels import backends
    if impl == "timm":
        return "timm"
    if impl in STAGE_KNOBS or backends.supports(impl, "fusion_stage", device, dtype) is None:
        return "stage op"
    return "per piece"


def stage_modes(impl: str) -> Sequence[str]:
    """The modes where the fusion-stage variant ``impl`` is timed (a knob: where it changes anything)."""
    return STAGE_KNOBS[impl]["modes"] if impl in STAGE_KNOBS else ("fwd", "fwd+bwd")


def default_impls(op: str, device: torch.device, dtype: torch.dtype, allow_interpreter: bool = False) -> List[str]:
    """timm, reference and every fused backend that runs here; on a GPU also sdpa, triton-unfused
    and triton-core (where the time goes inside the fused op); for the fusion stage also the knob
    variants (STAGE_KNOBS)."""
    names = ["timm", "reference"] + list(FUSED_BACKENDS)
    if op == "cross_attention" and (device.type == "cuda" or allow_interpreter):
        names += ["sdpa", "triton-unfused", "triton-core"]
    if op == "fusion_stage":
        names += list(STAGE_KNOBS)
    return [n for n in names if impl_status(op, n, device, dtype, allow_interpreter) is None]


def randn(*shape, device, dtype, scale: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Normal samples drawn in float32 on the CPU (the same numbers on every device), then moved."""
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


CA_PARAMS = ("norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


def cross_attention_inputs(B: int, N: int, C: int, device, dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """x_cls (B, C), the other branch (B, N, C) whose tokens ``branch[:, 1:]`` are attended to (a
    strided view, as in the model), the block's parameters (LayerNorm affine away from (1, 0), so
    no term is trivially skipped), and the output gradient ``grad`` (B, C)."""
    g = torch.Generator().manual_seed(seed)
    r = functools.partial(randn, device=device, dtype=dtype, generator=g)
    t = {"x_cls": r(B, C), "branch": r(B, N, C), "norm_weight": 1.0 + r(C, scale=0.1), "norm_bias": r(C, scale=0.1)}
    for name in "qkvo":
        t["w" + name] = r(C, C, scale=C ** -0.5)
        t["b" + name] = r(C, scale=0.02)
    t["grad"] = r(B, C)
    return t


def _timm_block(t: dict, H: int):
    """timm's CrossAttentionBlock holding the parameters of ``t`` (eps 1e-6, as timm's CrossViT)."""
    from timm.models.crossvit import CrossAttentionBlock
    C = t["x_cls"].shape[1]
    blk = CrossAttentionBlock(C, H, qkv_bias=True).to(device=t["x_cls"].device, dtype=t["x_cls"].dtype)
    blk.norm1.eps = 1e-6
    with torch.no_grad():
        pairs = [(blk.norm1.weight, "norm_weight"), (blk.norm1.bias, "norm_bias"), (blk.attn.proj.weight, "wo"),
                 (blk.attn.proj.bias, "bo")]
        for n in "qkv":
            lin = getattr(blk.attn, "w" + n)
            pairs += [(lin.weight, "w" + n), (lin.bias, "b" + n)]
        for p, name in pairs:
            p.copy_(t[name])
    return blk


def _sdpa(t: dict, H: int) -> torch.Tensor:
    import torch.nn.functional as F
    x_cls, x_tok = t["x_cls"], t["branch"][:, 1:]
    B, C = x_cls.shape
    x = F.layer_norm(torch.cat([x_cls.unsqueeze(1), x_tok], dim=1), (C,), t["norm_weight"], t["norm_bias"], 1e-6)
    N = x.shape[1]
    q = F.linear(x[:, :1], t["wq"], t["bq"]).reshape(B, 1, H, C // H).transpose(1, 2)
    k = F.linear(x, t["wk"], t["bk"]).reshape(B, N, H, C // H).transpose(1, 2)
    v = F.linear(x, t["wv"], t["bv"]).reshape(B, N, H, C // H).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C)
    return x_cls + F.linear(o, t["wo"], t["bo"])


def _forward(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def _forward_backward(fn: Callable[[], torch.Tensor], leaves: List[torch.Tensor], grad: torch.Tensor):
    def run():
        return torch.autograd.grad(fn(), leaves, grad, allow_unused=True)
    return run


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def cross_attention_fn(t: dict, H: int, impl: str, mode: str) -> Callable[[], object]:
    """The callable that runs variant ``impl`` on the inputs ``t`` once ("fwd" or "fwd+bwd")."""
    from crossvit_kernels.ops import cross_attention
    grad = mode == "fwd+bwd"
    x_cls, branch = t["x_cls"], t["branch"]
    if impl in ("read", "copy"):
        tokens = branch[:, 1:].contiguous()
        if impl == "read":
            return lambda: tokens.sum()
        buf = torch.empty_like(tokens)
        return lambda: buf.copy_(tokens)
    if impl.endswith("-core"):
        from crossvit_kernels.backends import get_backend
        be = get_backend(impl[:-len("-core")])
        B, C = x_cls.shape
        acc = torch.float64 if x_cls.dtype == torch.float64 else torch.float32
        w = randn(B, H, C, device=x_cls.device, dtype=acc, scale=C ** -0.5).contiguous()
        dz = randn(B, H, C, device=x_cls.device, dtype=acc)
        tokens = branch[:, 1:]

        def core():
            with torch.no_grad():
                z, lse = be.cross_attention_core_forward(x_cls, tokens, w, 1e-6)
                if grad:
                    return be.cross_attention_core_backward(x_cls, tokens, w, z, lse, dz, 1e-6)
                return z, lse
        return core
    inputs = {k: (v.detach().requires_grad_(grad) if k != "grad" else v) for k, v in t.items()}
    x_cls, branch = inputs["x_cls"], inputs["branch"]
    leaves = [inputs[k] for k in ("x_cls", "branch") + CA_PARAMS]
    if impl == "timm":
        blk = _timm_block(t, H).requires_grad_(grad)
        fn = lambda: blk(torch.cat([x_cls.unsqueeze(1), branch[:, 1:]], dim=1)).squeeze(1)  # noqa: E731
        leaves = [x_cls, branch] + list(blk.parameters())
    elif impl == "sdpa":
        fn = lambda: _sdpa(inputs, H)  # noqa: E731
    else:
        backend = "triton" if impl == "triton-unfused" else impl
        args = [inputs[k] for k in CA_PARAMS]

        def fn():
            return cross_attention(x_cls, branch[:, 1:], *args, num_heads=H, eps=1e-6, backend=backend)
        if impl == "triton-unfused":
            from crossvit_kernels.backends.triton.projections import FUSED_ENV
            fused = fn

            def fn():
                with _env(FUSED_ENV, "0"):
                    return fused()
    return _forward_backward(fn, leaves, t["grad"]) if grad else _forward(fn)


def patch_embed_inputs(B: int, img: int, patch: int, C: int, device, dtype, seed: int = 0,
                       cin: int = 3) -> Dict[str, torch.Tensor]:
    """Images, the projection's weight and bias, position embedding, CLS token, output gradient."""
    P = (img // patch) ** 2
    g = torch.Generator().manual_seed(seed)
    r = functools.partial(randn, device=device, dtype=dtype, generator=g)
    return {"images": r(B, cin, img, img), "weight": r(C, cin, patch, patch, scale=(cin * patch * patch) ** -0.5),
            "bias": r(C, scale=0.1), "pos_embed": r(1, 1 + P, C, scale=0.02), "cls_token": r(1, 1, C, scale=0.02),
            "grad": r(B, 1 + P, C)}


PE_PARAMS = ("weight", "bias", "pos_embed", "cls_token")


def patch_embed_fn(t: dict, impl: str, mode: str) -> Callable[[], object]:
    """The callable that runs variant ``impl`` of the patch embedding once; with a gradient, the
    parameters' gradients (the images need none, as in training)."""
    from crossvit_kernels.ops import patch_embed
    grad = mode == "fwd+bwd"
    images = t["images"]
    params = {k: t[k].detach().requires_grad_(grad) for k in PE_PARAMS}
    leaves = [params[k] for k in PE_PARAMS]
    if impl == "timm":
        from timm.models.crossvit import PatchEmbed
        C, cin, p, _ = t["weight"].shape
        pe = PatchEmbed(img_size=images.shape[-1], patch_size=p, in_chans=cin, embed_dim=C).to(images.device,
                                                                                              images.dtype)
        with torch.no_grad():
            pe.proj.weight.copy_(t["weight"])
            pe.proj.bias.copy_(t["bias"])
        pe.requires_grad_(grad)
        cls, pos = params["cls_token"], params["pos_embed"]
        B = images.shape[0]
        fn = lambda: torch.cat([cls.expand(B, -1, -1), pe(images)], dim=1) + pos  # noqa: E731
        leaves = [pe.proj.weight, pe.proj.bias, cls, pos]
    else:
        fn = lambda: patch_embed(images, *leaves, backend=impl)  # noqa: E731
    return _forward_backward(fn, leaves, t["grad"]) if grad else _forward(fn)


def fusion_stage_fn(model: str, fusion: str, backend: str, B: int, mode: str, device, dtype,
                    model_kwargs: Optional[dict] = None) -> Callable[[], object]:
    """The fusion stage of the first multi-scale block of ``model`` under scheme ``fusion``, run by
    ``backend`` on (B, 1 + P_i, C_i) token inputs of both branches ("fwd" or "fwd+bwd"; the "none"
    scheme returns its inputs and has no fwd+bwd)."""
    import crossvit_kernels as ck
    from crossvit_kernels.models import create_model
    torch.manual_seed(0)
    blk = create_model(model, fusion=fusion, **(model_kwargs or {})).blocks[0].to(device, dtype)
    geo = variant_geometry(model)
    g = torch.Generator().manual_seed(0)
    shapes = [(B, 1 + P, C) for P, C in zip(geo["num_patches"], geo["embed_dim"])]
    xs = [randn(*s, device=device, dtype=dtype, generator=g).requires_grad_(mode != "fwd") for s in shapes]
    grads = [randn(*s, device=device, dtype=dtype, generator=g) for s in shapes]
    leaves = xs + list(blk.parameters())

    def fn():
        with ck.use_backend(backend):
            return blk.forward_fusion(xs)
    if mode == "fwd":
        return _forward(fn)
    if fusion == "none":
        raise ValueError("the 'none' fusion returns its inputs: it has no fwd+bwd")
    return _forward_backward(fn, leaves, grads)


def _stage_block_kwargs(s: dict) -> dict:
    """Constructor arguments of a multi-scale block of stage geometry ``s`` with no encoder layers
    (timm's MultiScaleBlock and the package's take the same): branch b's heads are those of the
    direction that attends over it (1 - b); the fusion's blocks have no MLP (mlp_ratio unused)."""
    import torch.nn as nn
    return dict(dim=(s["C0"], s["C1"]), patches=(s["N0"] - 1, s["N1"] - 1), depth=(0, 0, 0),
                num_heads=(s["H1"], s["H0"]), mlp_ratio=(1.0, 1.0, 1.0), qkv_bias=True, drop_path=[0.0],
                norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def stage_inputs(s: dict, B: int, device, dtype, seed: int = 0) -> dict:
    """The package's multi-scale block of stage geometry ``s`` (its forward is the fusion stage
    alone), every parameter drawn from a seeded generator (LayerNorm affine away from (1, 0));
    both branches' tokens (B, N_b, C_b) and the output gradients."""
    import torch.nn as nn

    from crossvit_kernels.models.crossvit import MultiScaleBlock
    g = torch.Generator().manual_seed(seed)
    r = functools.partial(randn, device="cpu", dtype=torch.float32, generator=g)
    blk = MultiScaleBlock(**_stage_block_kwargs(s))
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + r(*m.weight.shape, scale=0.1))
                m.bias.copy_(r(*m.bias.shape, scale=0.1))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(r(*m.weight.shape, scale=m.in_features ** -0.5))
                m.bias.copy_(r(*m.bias.shape, scale=0.02))
    shapes = [(B, s["N0"], s["C0"]), (B, s["N1"], s["C1"])]
    return {"geometry": s, "block": blk.to(device, dtype),
            "xs": [randn(*x, device=device, dtype=dtype, generator=g) for x in shapes],
            "grads": [randn(*x, device=device, dtype=dtype, generator=g) for x in shapes]}


def _timm_stage_block(t: dict):
    """timm's MultiScaleBlock holding the parameters of ``t``'s block, its (absent) encoder layers
    replaced by identities: its forward is timm's composition of the fusion stage."""
    import torch.nn as nn
    from timm.models.crossvit import MultiScaleBlock
    tb = MultiScaleBlock(**_stage_block_kwargs(t["geometry"]))
    tb.load_state_dict(t["block"].state_dict())
    tb.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])
    return tb.to(t["xs"][0].device, t["xs"][0].dtype)


def _stage_forward(t: dict, impl: str):
    """(forward, module): ``forward(xs)`` runs variant ``impl`` of the fusion stage on the branches
    ``xs`` with the parameters of ``module``: timm's block, or the package's block (the model's
    entry: ``MultiScaleBlock.forward`` with no encoder layers) on backend ``impl``, a knob variant
    on triton with its knob set."""
    if impl == "timm":
        blk = _timm_stage_block(t)
        return blk, blk
    import importlib

    import crossvit_kernels as ck
    blk, backend, knob = t["block"], impl, contextlib.nullcontext
    if impl in STAGE_KNOBS:
        k = STAGE_KNOBS[impl]
        env = getattr(importlib.import_module(f"crossvit_kernels.backends.triton.{k['module']}"), k["env"])
        backend, knob = "triton", functools.partial(_env, env, k["value"])

    def forward(xs):
        with ck.use_backend(backend), knob():
            return blk(xs)
    return forward, blk


def stage_fn(t: dict, impl: str, mode: str) -> Callable[[], object]:
    """The callable that runs variant ``impl`` of the fusion stage on the inputs ``t`` once; with a
    gradient, the gradients of both branches and of every parameter."""
    if mode not in stage_modes(impl):
        raise ValueError(f"{impl} changes nothing in {mode}")
    forward, blk = _stage_forward(t, impl)
    grad = mode == "fwd+bwd"
    xs = [x.detach().requires_grad_(grad) for x in t["xs"]]
    fn = lambda: forward(xs)  # noqa: E731
    return _forward_backward(fn, xs + list(blk.parameters()), t["grads"]) if grad else _forward(fn)


#: parameters left out of the gradient errors: the key projections' biases, whose gradient is zero
#: in exact arithmetic (the softmax does not see a shift common to all scores): the oracle's is
#: rounding noise, and an error relative to it means nothing
STAGE_ZERO_GRADS = ("fusion.0.attn.wk.bias", "fusion.1.attn.wk.bias")


def stage_errors(t: dict, impls: Sequence[str]) -> Dict[str, dict]:
    """{impl: {"out_err", "grad_err"}}: each variant's outputs and gradients (both branches', every
    parameter's but STAGE_ZERO_GRADS) against the float64 oracle, the reference backend's textbook
    stage on the inputs ``t`` upcast; an error is max |x - oracle| / max |oracle| per tensor, the
    largest over the tensors."""
    import copy

    def run(t, impl):
        forward, blk = _stage_forward(t, impl)
        xs = [x.detach().requires_grad_() for x in t["xs"]]
        names, params = zip(*blk.named_parameters())
        outs = forward(xs)
        grads = torch.autograd.grad(outs, xs + list(params), t["grads"])
        return [o.detach() for o in outs], dict(zip(("x0", "x1") + names, grads))

    t64 = dict(t, block=copy.deepcopy(t["block"]).double(), xs=[x.double() for x in t["xs"]],
               grads=[g.double() for g in t["grads"]])
    ref_outs, ref_grads = run(t64, "reference")

    def err(a, o):
        return float((a.double() - o).abs().max() / o.abs().max())

    out = {}
    for impl in impls:
        outs, grads = run(t, impl)
        out[impl] = {"out_err": max(err(a, o) for a, o in zip(outs, ref_outs)),
                     "grad_err": max(err(grads[n], g) for n, g in ref_grads.items() if n not in STAGE_ZERO_GRADS)}
    return out


# ------------------------------------------------------------------------------------------------
# the compact result format
# ------------------------------------------------------------------------------------------------
# A results file is one JSON object: the environment, the settings, and per dtype and section a
# few "tables" {"columns": [...], "rows": [[...], ...]} whose numbers are rounded to 4 significant
# digits: medians, quartiles and repeat counts, never the per-call samples (run.py writes those to
# benchmarks/out/). One row per line, so that results diff line by line.

TIMING_COLUMNS = ("median_ms", "q25_ms", "q75_ms", "reps")


def rnd(x, sig: int = 4):
    if isinstance(x, float):
        if not math.isfinite(x) or x == 0:
            return x if math.isfinite(x) else None
        return round(x, max(0, sig - 1 - int(math.floor(math.log10(abs(x))))))
    return x


def make_table(columns: Sequence[str], rows: Iterable[dict]) -> dict:
    """A table of ``rows`` (dicts); columns that no row has are left out."""
    rows = list(rows)
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)] if rows else list(columns)
    return {"columns": columns, "rows": [[rnd(r.get(c)) for c in columns] for r in rows]}


def records(table: Optional[dict]) -> List[dict]:
    """The rows of a table as dicts."""
    if not table:
        return []
    cols = table["columns"]
    return [dict(zip(cols, row)) for row in table["rows"]]


def _compact_dumps(obj, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        if set(obj) == {"columns", "rows"}:
            rows = ",\n".join(f"{pad}  {json.dumps(r)}" for r in obj["rows"])
            return f'{{"columns": {json.dumps(obj["columns"])}, "rows": [\n{rows}\n{pad}]}}'
        items = [f'{pad} {json.dumps(k)}: {_compact_dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return json.dumps(obj, default=str)


def write_results(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(_compact_dumps(doc) + "\n")
    os.replace(tmp, path)


def read_results(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
