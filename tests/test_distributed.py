"""Data-parallel training on the CPU (gloo, two processes): DistributedDataParallel and FSDP2's
``fully_shard`` over ours and patched models give the gradients of timm's model on the whole batch.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import crossvit_kernels as ck

_CHILD = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from helpers import tiny_images, tiny_pair
which = sys.argv[2]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
dist.init_process_group("gloo")
x = tiny_images(4)
mine = x[2 * rank:2 * rank + 2]
for wrap in ("ddp", "fsdp2"):
    ref, model = tiny_pair(which)
    ref.train(); model.train()
    ref(x).square().sum().backward()                       # the whole batch, one process, timm's model
    if wrap == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
        net(mine).square().sum().mul(2).backward()           # DDP averages: x2 gives the sum over both ranks
        grads = {n: p.grad for n, p in net.module.named_parameters()}
    else:
        from torch.distributed.fsdp import fully_shard
        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
        model(mine).square().sum().mul(2).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{wrap} {n}: {m}")
dist.destroy_process_group()
print("ok", rank)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("which", ["ours", "patched"])
def test_ddp_and_fsdp2_gradients_match_timm(which):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(ck.__file__)),
                                                       os.environ.get("PYTHONPATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, os.path.dirname(__file__), which],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and out.strip().endswith(f"ok {r}"), f"rank {r}:\n{out}\n{err[-3000:]}"
