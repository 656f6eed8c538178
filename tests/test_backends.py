"""Backend registry, dispatch, the env var, lazy imports and the info CLI."""
import json
import os
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
