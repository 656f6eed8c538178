"""Backend registry, dispatch, the env var, lazy imports and the info CLI."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import crossvit_kernels as ck
from crossvit_kernels import backends
from helpers import cross_attention_inputs, run_cross_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, env_extra=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop(backends.ENV_VAR, None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_available_backends_reports_every_backend():
    avail = ck.available_backends()
    assert set(avail) == set(ck.BACKENDS)
    assert avail["torch"] is True and avail["reference"] is True
    for name, status in avail.items():
        assert status is True or (isinstance(status, str) and status), f"{name}: {status!r}"
    if not torch.cuda.is_available():
        assert avail["cuda"] is not True


def test_auto_never_picks_reference_and_prefers_compiled_on_cpu():
    chosen = backends.resolve_backend("cross_attention", "auto", torch.device("cpu"), torch.float32)
    assert chosen in ("cpp", "torch")
    if ck.available_backends()["cpp"] is True:
        assert chosen == "cpp"
    text = ck.explain_dispatch("cross_attention", "cpu")
    assert f"auto -> {chosen}" in text and "torch" in text


def test_use_backend_context_manager_selects_the_path():
    inp = cross_attention_inputs(2, 4, 8, 2, torch.float64, requires_grad=False)
    ref = run_cross_attention(inp, "reference")[0]
    with ck.use_backend("reference"):
        assert backends.get_default_backend() == "reference"
        inside = run_cross_attention(inp, None)[0]
    assert backends.get_default_backend() == "auto"
    assert torch.equal(inside, ref)  # the reference path is bit-for-bit the textbook one


def test_env_var_sets_default_and_rejects_garbage():
    r = run_py("import crossvit_kernels.backends as b; print(b.get_default_backend())",
               {backends.ENV_VAR: "torch"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "torch"
    r = run_py("import crossvit_kernels", {backends.ENV_VAR: "warp"})
    assert r.returncode != 0
    assert "CROSSVIT_KERNELS_BACKEND='warp' is invalid" in r.stderr


def test_import_is_lazy():
    """Importing the package (and building a model on the CPU) imports neither Triton nor the
    compiled extension, and never initialises CUDA."""
    code = ("import sys, torch, crossvit_kernels as ck\n"
            "m = ck.create_model('crossvit_tiny_240')\n"
            "bad = [k for k in sys.modules if k == 'triton' or k.startswith('crossvit_kernels._C')"
            " or k == 'crossvit_kernels.triton']\n"
            "print(bad, torch.cuda.is_initialized())\n")
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] False", r.stdout


def test_broken_backend_module_degrades_with_one_warning(monkeypatch):
    """A backend whose import fails (as a broken extension would) is reported unavailable with the
    reason, auto falls back to the next backend and warns exactly once."""
    monkeypatch.setitem(backends._CLASSES, "cpp", ("crossvit_kernels._no_such_module_for_test", "CppBackend"))
    monkeypatch.setattr(backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "cpp"})
    monkeypatch.setattr(backends, "_load_errors", {})
    monkeypatch.setattr(backends, "_warned", set())
    avail = ck.available_backends()
    assert "failed to import" in avail["cpp"]
    inp = cross_attention_inputs(1, 3, 8, 2, torch.float32, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="falls back to backend 'torch'"):
        run_cross_attention(inp, None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_cross_attention(inp, None)  # second call: no second warning


def test_info_cli_text_and_json():
    r = run_py("from crossvit_kernels.info import main; main()")
    assert r.returncode == 0, r.stderr
    for needle in ("crossvit_kernels", "torch", "triton", "timm", "backends:", "reference", "available",
                   "dispatch"):
        assert needle in r.stdout
    for name in ck.BACKENDS:
        assert f"  {name}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "crossvit_kernels.info", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert set(info["backends"]) == set(ck.BACKENDS)
    assert info["backends"]["torch"] is True
    assert info["devices"][0]["type"] == "cpu"
    for status in info["backends"].values():
        assert status is True or isinstance(status, str)


# ---------------------------------------------------------------------------------------------
# limits of a backend's kernels on an op's sizes (SizeLimit), read by supports / resolve_backend
# ---------------------------------------------------------------------------------------------

F32 = torch.float32
CPU = torch.device("cpu")


def _limited_cpp(monkeypatch, limit, backward=False):
    """Registers a stand-in for "cpp" (the torch backend's cores, on CPU tensors) whose
    cross_attention declares B <= ``limit`` (for its backward alone with ``backward``); it counts
    its core calls."""
    from crossvit_kernels.backends.base import SizeLimit
    from crossvit_kernels.backends.pytorch import TorchBackend

    class Limited(TorchBackend):
        name = "cpp"
        devices = ("cpu",)
        size_limits = {"cross_attention": (SizeLimit("the batch size B", lambda s: s["B"], limit, "a test's limit",
                                                     backward=backward),)}
        calls = 0

        def cross_attention_core_forward(self, *args):
            self.calls += 1
            return super().cross_attention_core_forward(*args)

    backend = Limited()
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded, cpp=backend))
    monkeypatch.setattr(backends, "_load_errors", {k: v for k, v in backends._load_errors.items() if k != "cpp"})
    return backend


def test_size_limit_makes_auto_skip_and_a_named_backend_refuse(monkeypatch):
    _limited_cpp(monkeypatch, 2)
    small, big = dict(B=2, M=3, C=8, H=2), dict(B=3, M=3, C=8, H=2)
    reason = "the batch size B is 3, more than the cpp backend's limit of 2: a test's limit"
    assert backends.supports("cpp", "cross_attention", "cpu", F32, small) is None
    assert backends.supports("cpp", "cross_attention", "cpu", F32, big) == reason
    assert backends.supports("cpp", "cross_attention", "cpu", F32) is None      # no sizes: dtype and device only
    assert backends.resolve_backend("cross_attention", "auto", CPU, F32, small) == "cpp"
    assert backends.resolve_backend("cross_attention", "auto", CPU, F32, big) == "torch"
    with pytest.raises(NotImplementedError, match=r"backend 'cpp' cannot run cross_attention on cpu torch.float32: "
                                                  + re.escape(reason)):
        backends.resolve_backend("cross_attention", "cpp", CPU, F32, big)
    text = ck.explain_dispatch("cross_attention", "cpu", F32, big)
    assert text.splitlines()[0] == "cross_attention (B=3, M=3, C=8, H=2) on cpu torch.float32: auto -> torch"
    assert f"  cpp: skipped ({reason})" in text.splitlines()
    assert "auto -> cpp" in ck.explain_dispatch("cross_attention", "cpu", F32, small)


def test_size_limit_applies_to_the_op_call(monkeypatch):
    """The op passes its sizes: auto runs a batch over the limit on the next backend (same result,
    the limited backend never called), a named request raises NotImplementedError with the reason."""
    limited = _limited_cpp(monkeypatch, 2)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # skipping for a limit is normal: no warning
        run_cross_attention(cross_attention_inputs(2, 3, 8, 2, F32, requires_grad=False), None)
        assert limited.calls == 1
        inp = cross_attention_inputs(3, 3, 8, 2, F32, requires_grad=False)
        out = run_cross_attention(inp, None)[0]
    assert limited.calls == 1
    assert torch.equal(out, run_cross_attention(inp, "torch")[0])
    with pytest.raises(NotImplementedError, match=r"the batch size B is 3, more than the cpp backend's limit of 2"):
        run_cross_attention(inp, "cpp")
    assert limited.calls == 1


def test_backward_limit_applies_to_inputs_that_need_a_gradient(monkeypatch):
    """A limit of the backward's kernels alone: inference over it stays on the backend, training
    goes to the next one (auto) or is refused (by name); explain_dispatch says which it answers."""
    limited = _limited_cpp(monkeypatch, 2, backward=True)
    big = dict(B=3, M=3, C=8, H=2)
    assert backends.supports("cpp", "cross_attention", "cpu", F32, big, backward=False) is None
    assert "limit of 2" in backends.supports("cpp", "cross_attention", "cpu", F32, big)
    assert "; forward only) on cpu torch.float32: auto -> cpp" in ck.explain_dispatch(
        "cross_attention", "cpu", F32, big, backward=False)
    inp = cross_attention_inputs(3, 3, 8, 2, F32, requires_grad=False)
    run_cross_attention(inp, "cpp")
    with torch.no_grad():
        run_cross_attention(cross_attention_inputs(3, 3, 8, 2, F32), None)
    assert limited.calls == 2
    train = cross_attention_inputs(3, 3, 8, 2, F32)
    out, grads = run_cross_attention(train, None, torch.ones(3, 8))
    assert limited.calls == 2 and grads["x_cls"] is not None
    with pytest.raises(NotImplementedError, match="the batch size B is 3, more than the cpp backend's limit of 2"):
        run_cross_attention(train, "cpp")


def test_size_limit_reads_its_dtypes_devices_and_device_maximum():
    from crossvit_kernels.backends.base import Backend, SizeLimit

    class Fake(Backend):
        name = "fake"
        size_limits = {"cross_attention": (
            SizeLimit("the width C", lambda s: s["C"], lambda device: 8 * (1 + device.index), "why",
                      dtypes=(torch.float16,), devices=("cuda",)),)}

    fake, sizes = Fake(), dict(B=1, M=1, C=16, H=1)
    assert (fake.limits("cross_attention", torch.device("cuda", 0), torch.float16, sizes)
            == "the width C is 16, more than the fake backend's limit of 8: why")
    assert fake.limits("cross_attention", torch.device("cuda", 1), torch.float16, sizes) is None
    assert fake.limits("cross_attention", torch.device("cuda", 0), torch.float32, sizes) is None
    assert fake.limits("cross_attention", CPU, torch.float16, sizes) is None
    assert fake.limits("patch_embed", torch.device("cuda", 0), torch.float16, {}) is None


def test_sizes_must_name_every_size_of_the_op():
    with pytest.raises(ValueError, match="sizes of cross_attention must give B, M, C, H; missing H"):
        backends.supports("torch", "cross_attention", "cpu", F32, dict(B=1, M=1, C=8))
    with pytest.raises(TypeError, match="sizes must be a mapping"):
        ck.explain_dispatch("cross_attention", "cpu", F32, (1, 1, 8, 2))


def _h100_shared_memory(monkeypatch, nbytes=227 * 1024):
    """The opt-in shared memory per block of the CUDA device, as an H100 reports it, without a GPU."""
    from crossvit_kernels.backends import base
    monkeypatch.setattr(base, "_shared_memory_per_block", lambda index: nbytes)


def test_cuda_backend_declares_its_launch_limits(monkeypatch):
    """The cuda backend's kernels raise RuntimeError beyond B = 65535, 256 heads and the GPU's
    shared memory per block: declared as its size limits (read here without a GPU)."""
    from crossvit_kernels.backends.extension import CudaBackend
    _h100_shared_memory(monkeypatch)
    cuda, dev, bf16 = CudaBackend(), torch.device("cuda", 0), torch.bfloat16   # the declaration: nothing loads
    ok = dict(B=65535, M=400, C=448, H=7)
    assert cuda.limits("cross_attention", dev, bf16, ok) is None
    assert cuda.limits("cross_attention", dev, bf16, dict(ok, B=65536)).startswith(
        "the batch size B is 65536, more than the cuda backend's limit of 65535: the CUDA kernels put the batch on")
    assert cuda.limits("cross_attention", dev, bf16, dict(ok, C=1024, H=512)).startswith(
        "the number of heads H is 512, more than the cuda backend's limit of 256")
    assert cuda.limits("cross_attention", dev, bf16, dict(ok, C=768, H=12)) is None        # CrossViT-B
    # at their one-token tiles the forward needs (2 H C + 4 H + C) floats, the backward
    # (3 H C + 4 H + 2 C + 1): C = 1536, H = 16 fits an H100 forward only, C = 2048 not at all
    wide, wider = dict(ok, C=1536, H=16), dict(ok, C=2048, H=16)
    need = 4 * (3 * 16 * 1536 + 4 * 16 + 2 * 1536 + 1)
    assert cuda.limits("cross_attention", dev, bf16, wide).startswith(
        f"the shared memory of the backward kernel (bytes per block) is {need}, more than the cuda backend's "
        f"limit of {227 * 1024}")
    assert cuda.limits("cross_attention", dev, bf16, wide, backward=False) is None
    assert cuda.limits("cross_attention", dev, bf16, wider, backward=False).startswith(
        f"the shared memory of the forward kernel (bytes per block) is {4 * (2 * 16 * 2048 + 4 * 16 + 2048)}")
    _h100_shared_memory(monkeypatch, need)                                       # exactly at the GPU's
    assert cuda.limits("cross_attention", dev, bf16, wide) is None
    _h100_shared_memory(monkeypatch, need - 1)
    assert cuda.limits("cross_attention", dev, bf16, wide) is not None
    # the patch embedding's kernels loop over any size
    pe = dict(B=10 ** 6, Cin=3, IH=240, IW=240, C=4096, PH=12, PW=12)
    assert cuda.limits("patch_embed", dev, bf16, pe) is None


def test_cuda_limits_match_the_kernels_source():
    """The declaration follows csrc/crossvit_cuda.cu: its batch check, its threads per block (one
    per head at most) and the backward's shared-memory terms in pick_tile (larger than the
    forward's)."""
    from crossvit_kernels.backends.extension import CUDA_GRID_Y, CUDA_THREADS
    with open(os.path.join(ROOT, "csrc", "crossvit_cuda.cu")) as f:
        src = f.read()
    assert f"TORCH_CHECK(s.B <= {CUDA_GRID_Y}," in src
    assert f"constexpr int kThreads = {CUDA_THREADS};" in src and "TORCH_CHECK(s.H <= kThreads," in src
    assert "pick_tile(kernel, 16, 3 * s.H * s.C + 2 * s.H, 2 * s.C + 2 * s.H + 1)" in src
    assert "pick_tile(kernel, 32, 2 * s.H * s.C + 3 * s.H, s.C + s.H)" in src


def test_cuda_limits_send_auto_elsewhere_and_refuse_by_name(monkeypatch):
    """For CUDA tensors (resolved here without a GPU: dispatch reads declarations only), a batch
    over the cuda backend's limit goes to the next backend under auto, and backend="cuda" raises
    NotImplementedError naming the limit. The triton backend is marked unavailable to test the
    cuda one."""
    from crossvit_kernels.backends.extension import CudaBackend
    _h100_shared_memory(monkeypatch)
    monkeypatch.setattr(backends, "_loaded", dict({k: v for k, v in backends._loaded.items() if k != "triton"},
                                                  cuda=CudaBackend()))
    monkeypatch.setattr(backends, "_load_errors", dict({k: v for k, v in backends._load_errors.items()
                                                        if k != "cuda"}, triton="unavailable in this test"))
    dev, bf16 = torch.device("cuda", 0), torch.bfloat16
    big = dict(B=70000, M=196, C=448, H=7)
    assert backends.resolve_backend("cross_attention", "auto", dev, bf16, dict(big, B=64)) == "cuda"
    assert backends.resolve_backend("cross_attention", "auto", dev, bf16, big) == "torch"
    with pytest.raises(NotImplementedError, match=r"backend 'cuda' cannot run cross_attention on cuda torch.bfloat16: "
                                                  r"the batch size B is 70000, more than the cuda backend's limit "
                                                  r"of 65535"):
        backends.resolve_backend("cross_attention", "cuda", dev, bf16, big)
    text = ck.explain_dispatch("cross_attention", dev, bf16, big)
    assert "auto -> torch" in text and "  cuda: skipped (the batch size B is 70000" in text


def test_explain_dispatch_with_sizes_for_cuda_on_any_machine():
    """Asked about CUDA tensors of given sizes, dispatch answers on a machine without a GPU too
    (where, under the interpreter, the triton backend counts as available for them)."""
    text = ck.explain_dispatch("cross_attention", "cuda", torch.bfloat16, dict(B=70000, M=196, C=448, H=7))
    assert text.startswith("cross_attention (B=70000, M=196, C=448, H=7) on cuda torch.bfloat16: auto -> ")
