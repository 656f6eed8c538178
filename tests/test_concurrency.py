"""Long runs and concurrency: no memory growth over many calls, concurrent first use of every
backend (extension load, Triton compile) without deadlock or wrong results, and a model used from
several threads while another thread loads a checkpoint."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

import crossvit_kernels as ck
from crossvit_kernels.ops import cross_attention, patch_embed
from helpers import XATTN_ARGS, assert_close, cross_attention_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


@pytest.mark.skipif(ck.available_backends()["cpp"] is not True, reason="the cpp backend is not built")
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set size")
def test_ten_thousand_calls_do_not_grow_memory():
    """10,000 calls on the cpp backend (5,000 of each op, every tenth with a backward): after a
    warm-up, neither the number of live tensors nor the resident set grows (a leak of one small
    buffer per call would add megabytes)."""
    inp = cross_attention_inputs(2, 16, 32, 4, torch.float32)
    args = [inp[k] for k in XATTN_ARGS]
    images, weight = torch.randn(2, 3, 8, 8), torch.randn(8, 3, 4, 4, requires_grad=True)
    pos, cls = torch.randn(5, 8, requires_grad=True), torch.randn(8, requires_grad=True)

    def step(i):
        grad = i % 10 == 0
        with torch.set_grad_enabled(grad):
            out = cross_attention(*args, num_heads=4, backend="cpp")
            tokens = patch_embed(images, weight, None, pos, cls, backend="cpp")
            if grad:
                (out.sum() + tokens.sum()).backward()

    for i in range(500):
        step(i)
    tensors, rss = _live_tensors(), _rss_bytes()
    for i in range(5_000):
        step(i)
    assert _live_tensors() <= tensors, "tensors accumulate across calls"
    growth = _rss_bytes() - rss
    assert growth < 8 * 2 ** 20, f"resident memory grew by {growth / 2 ** 20:.1f} MiB over 10,000 calls"


_FIRST_USE = r"""
import sys, threading, torch
sys.path.insert(0, sys.argv[1])
import crossvit_kernels as ck
from crossvit_kernels.ops import cross_attention, patch_embed
from helpers import XATTN_ARGS, cross_attention_inputs

backends = [b for b in ("cpp", "torch", "triton") if ck.available_backends()[b] is True]
inp = cross_attention_inputs(2, 9, 24, 3, torch.float32, requires_grad=False)
args = [inp[k] for k in XATTN_ARGS]
pe = (torch.randn(2, 3, 12, 12), torch.randn(6, 3, 4, 4), torch.randn(6), torch.randn(10, 6), torch.randn(6))
expected = (cross_attention(*args, num_heads=3, backend="reference"), patch_embed(*pe, backend="reference"))
barrier = threading.Barrier(4)
results, errors = {}, []

def work(t):
    try:
        barrier.wait()
        for b in backends:   # every thread makes the first call of every backend at the same time
            results[(t, b)] = (cross_attention(*args, num_heads=3, backend=b), patch_embed(*pe, backend=b))
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=600)
assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
assert not errors, errors
for (t, b), (out, tokens) in results.items():
    torch.testing.assert_close(out, expected[0], atol=1e-4, rtol=1e-4, msg=lambda m: f"{b}: {m}")
    torch.testing.assert_close(tokens, expected[1], atol=1e-4, rtol=1e-4, msg=lambda m: f"{b}: {m}")
print("OK", sorted({b for _, b in results}), len(results))
"""


def test_four_threads_make_the_first_call_of_every_backend_at_once():
    """In a fresh process (nothing loaded yet), four threads call both ops on every available
    backend at the same moment: the extension loads once, Triton compiles once per kernel, every
    result is right, nothing deadlocks."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _FIRST_USE, os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("OK"), proc.stdout


def test_model_used_by_threads_while_another_thread_loads_a_checkpoint(tmp_path):
    """Three threads run inference on one model while a fourth builds models and loads a
    checkpoint file into them, over and over: the inference results stay exact, the loads complete."""
    torch.manual_seed(0)
    kw = dict(img_size=48, img_scale=(1.0, 1.0), num_classes=5)
    model = ck.create_model("crossvit_tiny_240", **kw).eval()
    path = tmp_path / "ckpt.pth"
    torch.save(ck.create_model("crossvit_tiny_240", **kw).state_dict(), path)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)
    stop, errors, loads = threading.Event(), [], []

    def infer():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    assert torch.equal(model(images), expected), "inference changed while a checkpoint loaded"
        except BaseException as exc:
            errors.append(repr(exc))

    def load():
        try:
            for _ in range(5):
                other = ck.create_model("crossvit_tiny_240", pretrained=str(path), **kw)
                loads.append(other)
        except BaseException as exc:
            errors.append(repr(exc))
        finally:
            stop.set()

    threads = [threading.Thread(target=infer) for _ in range(3)] + [threading.Thread(target=load)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    assert len(loads) == 5
    reference = torch.load(path, weights_only=True)
    for name, value in loads[-1].state_dict().items():
        assert_close(value, reference[name], atol=0, rtol=0, name=name)
